"""`optserve demo`: an embedded server, two trainer processes (`trainer`) over gRPC, a live
optimizer swap, a plot and a checkpoint (`run`). The demo is a client of the server: it uses the
public `optserve.client` API only."""
