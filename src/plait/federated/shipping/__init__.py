"""The training program travels (`net.ship_program = true`): the server sends the model and its task as
`torch.export` graphs with the initial weights, so that a client without the model's source trains it, and never
runs code received from the network. `trace.py` writes the program (server), `model.py` reads it back into a module
and a task (client), `graph.py` is the graph format and its interpreter, `container.py` the file and its hash."""
