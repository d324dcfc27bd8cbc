from aprtrace.cli import main

main()
