from swirl_vl.cli import main

main()
