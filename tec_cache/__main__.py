from tec_cache.build.cli import main

main()
