//! Microsoft Graph and identity-platform client (filled in by the Graph client work).
