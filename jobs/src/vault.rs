//! AES-SIV token vault (filled in by the Graph client work).
