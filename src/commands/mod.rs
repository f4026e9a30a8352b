//! The commands that are not a supervised run, a demo or a benchmark: the three processes of a
//! pipeline on their own, and the model, tokenizer and dataset tools.

pub mod concentrate;
pub mod model;
pub mod process;
pub mod tokenizer;
