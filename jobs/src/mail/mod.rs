//! Pure mail logic (filled in by the threading work).
