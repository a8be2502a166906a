"""EST enrollment methods, one module each: how a simpleenroll request proves which device it is."""
