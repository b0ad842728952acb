"""Commands registered on the groups of triageseg.cli.groups (filled in by the issue that owns it)."""
