//! Orders, order events, execution confirmations and account state
//! (filled in by the execution/accounts work).
