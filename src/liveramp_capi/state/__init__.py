"""Persistence in the state database: engines, schema versions, the delivery ledger, the envelope
store, the held conversions and the partition lease. The logic they serve lives in ``domain``."""
