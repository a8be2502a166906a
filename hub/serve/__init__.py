"""The running hub: the `serve` supervisor, its live actions (status changes that bite at once) and admin socket."""
