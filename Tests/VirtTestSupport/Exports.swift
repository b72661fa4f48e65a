// The tests drive servers with the same client the benchmark uses.
@_exported import VirtClient
