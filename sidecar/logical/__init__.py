"""The logical flow: a database dumped through our stages, and loaded back into a new database that is checked before it is swapped in."""
