from caitool.cli import main

main()
