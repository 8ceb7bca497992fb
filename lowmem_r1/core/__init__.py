"""The lowest layer: errors, writes that never lose what the user had, fault hooks for tests, the
allocator, and who this process is among several. Imports nothing else of the toolkit."""
