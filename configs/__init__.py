"""Installed as the package ``gossipfl.configs`` (see pyproject.toml): the default node config that
``gossipfl service install`` puts in /etc/gossipfl, found through importlib.resources.

An ``__init__.py`` is needed because setuptools' editable finder cannot import a namespace package whose
directory lies outside its parent's; there is no Python code here.
"""
