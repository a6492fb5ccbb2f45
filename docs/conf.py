"""Sphinx configuration for lightning-dp's documentation."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "lightning-dp"
author = "lightning-dp developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
html_theme = "alabaster"
exclude_patterns = ["_build"]
suppress_warnings = ["ref.python"]
nitpicky = False
