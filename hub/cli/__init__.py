"""`tessera-hub`: the command line (typer), thin over the fleet API and the running hub."""
