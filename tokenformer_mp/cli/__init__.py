"""The console scripts (pyproject.toml, [project.scripts]): one module per tool, each with main(argv) -> exit code.
tools/*.py call the same functions from a checkout."""
