//! JSON Lines shards, plain, gzip or zstd compressed: one JSON object per line.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use super::{doc_event, Event, Format, SkipReason};

/// The documents of a JSON-lines shard (plain, gzip or zstd), one per line.
pub struct JsonlDocs {
    reader: Box<dyn BufRead + Send>,
    text_field: String,
    row: u64,
    line: Vec<u8>,
    done: bool,
}

impl JsonlDocs {
    /// Opens a shard; the documents are read as the iterator is pulled.
    pub fn open(path: &Path, format: Format, text_field: &str) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
        let raw: Box<dyn Read + Send> = match format {
            Format::JsonlGz => Box::new(flate2::read::MultiGzDecoder::new(file)),
            Format::JsonlZst => {
                Box::new(zstd::Decoder::new(file).map_err(|e| format!("not zstd: {e}"))?)
            }
            _ => Box::new(file),
        };
        Ok(JsonlDocs {
            reader: Box::new(BufReader::with_capacity(1 << 20, raw)),
            text_field: text_field.to_string(),
            row: 0,
            line: Vec::new(),
            done: false,
        })
    }

    fn parse(&self, row: u64, line: &[u8]) -> Event {
        if std::str::from_utf8(line).is_err() {
            return Event::Skip {
                row,
                reason: SkipReason::BadUtf8,
            };
        }
        let value: serde_json::Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                return Event::Skip {
                    row,
                    reason: SkipReason::BadJson(e.to_string()),
                }
            }
        };
        match value {
            serde_json::Value::Object(mut map) => match map.remove(&self.text_field) {
                Some(serde_json::Value::String(text)) => doc_event(row, text),
                _ => Event::Skip {
                    row,
                    reason: SkipReason::NoText,
                },
            },
            _ => Event::Skip {
                row,
                reason: SkipReason::BadJson("not a JSON object".into()),
            },
        }
    }
}

impl Iterator for JsonlDocs {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        loop {
            if self.done {
                return None;
            }
            self.line.clear();
            match self.reader.read_until(b'\n', &mut self.line) {
                Ok(0) => {
                    self.done = true;
                    return None;
                }
                Ok(_) => {
                    let row = self.row;
                    self.row += 1;
                    let line = trim_line(&self.line);
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue; // blank line: not a row
                    }
                    return Some(self.parse(row, line));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Event::Damage {
                        row: Some(self.row),
                        reason: format!("read error (truncated or corrupt file?): {e}"),
                    });
                }
            }
        }
    }
}

fn trim_line(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && (line[end - 1] == b'\n' || line[end - 1] == b'\r') {
        end -= 1;
    }
    &line[..end]
}
