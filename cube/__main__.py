from cube.cli import app

app()
