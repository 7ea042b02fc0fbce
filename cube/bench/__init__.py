"""`cube bench`: measurements of Cube against its targets and, where one runs, a peer."""
