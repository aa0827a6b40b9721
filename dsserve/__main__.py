from dsserve.cli import main

main()
