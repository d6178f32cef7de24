from qdiff.eval.cli import main

main()
