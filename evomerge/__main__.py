from evomerge.cli import run

run()
