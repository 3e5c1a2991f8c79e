"""The search service: the contract shared by the CLI, the server and the client (`contract`), and the
checks that run in worker processes (`checks`). Nothing here imports torch or Ray."""
