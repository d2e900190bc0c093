from memvirt.cli.main import main

main()
