//! Raw and standardized signals (filled in by the signal-ingress work).
