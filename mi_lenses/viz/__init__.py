"""Rendering: circuitsvis views for notebooks, standalone offline HTML pages, terminal tables."""
