"""Provider adapters: each vendor's world translated into ours, behind one interface."""
