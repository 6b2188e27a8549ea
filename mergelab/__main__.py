from mergelab.cli import main

main()
