from tec_cache.cli import main

main()
