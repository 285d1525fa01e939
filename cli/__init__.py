"""The top layer: the ``upsr`` command and the root config (every section, the search's included).

It imports the jobs (``pipelines``) and the searches (``tune``); nothing imports it back.
"""
