from valley_rt.cli import main

main()
