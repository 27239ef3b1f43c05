"""Key backends behind one interface (``base.KeyBackend``): software, hsm, external."""
