"""AWQ (and the methods built on its scale search): :mod:`.config`, :mod:`.search`, :mod:`.method`."""
