"""Stage 1's application, `tec-cache`: build a cache, verify it, show it. Nothing in tec_train imports it.

    builder.py  the build: views --> base forward --> targets --> shards + manifest, resumable
    config.py   the build's options (the [cache] table and its flags) resolved into a BuildConfig
    verify.py   a cache's digest, listed shards and their records checked
    show.py     a cache described: manifest summary, views and targets drawn
    cli.py      the `tec-cache` command line
"""
