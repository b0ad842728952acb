"""``python -m triageseg`` runs the command line."""

from triageseg.cli.main import main

main()
