"""Persistence in the state database that is not the domain's own logic: the partition lease."""
