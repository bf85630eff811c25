from tec_train.cli import main

main()
