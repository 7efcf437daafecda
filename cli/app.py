import typer

app = typer.Typer()


@app.command()
def measure() -> None:
    print("todo")


def main() -> None:
    app()
