"""The cloud shell: one ComponentResource per concern, translating core data into resources."""
