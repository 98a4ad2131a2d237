from scoretk.cli import main

main()
