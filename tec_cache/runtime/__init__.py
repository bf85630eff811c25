"""The runtime both stages stand on, importing nothing else of the project (the lowest layer).

    config.py     option() fields, checks, overrides and environment-valued settings
    pipelines.py  named pipelines: the TOML presets, their families (extends) and tables
    dist.py       process groups, ranks and the barrier of a multi-process job
    faults.py     fault-injection points the reliability tests arm (TEC_FAULT)
    workers.py    data-loader workers that die with the process that started them
    run_log.py    how a failed run ends: one line on the terminal, the traceback in the log
    plain_log.py  logs and progress without a terminal (batch jobs, CI)
    version.py    the package version and what `--version` prints

Layers, lowest first: runtime < format < core < build (stage 1's application); stage 2 (tec_train)
uses runtime, format and core, never build.
"""
