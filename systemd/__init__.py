"""Installed as the package ``gossipfl.systemd`` (see pyproject.toml) so that ``gossipfl service install``
finds the unit and sysusers files through importlib.resources in editable and wheel installs alike.

An ``__init__.py`` is needed because setuptools' editable finder cannot import a namespace package whose
directory lies outside its parent's; there is no Python code here.
"""
