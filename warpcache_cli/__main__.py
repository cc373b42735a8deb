from warpcache_cli.cli.app import main

main()
