"""The tools: the command line and the offline rehearsal of the program under Pulumi mocks."""
