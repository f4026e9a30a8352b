//! Parquet shards in the HuggingFace OpenWebMath layout (`url`, `text`, `date`, `metadata`),
//! read one column chunk at a time: only the text column is decoded, a bounded number of rows at
//! a time, so memory stays flat whatever the shard size.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use parquet::basic::{Compression, ZstdLevel};
use parquet::column::reader::{get_typed_column_reader, ColumnReaderImpl};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use super::{bytes_event, Event, SkipReason};

/// Rows decoded per read.
const ROWS_PER_READ: usize = 256;

pub struct ParquetDocs {
    reader: SerializedFileReader<File>,
    column: usize,
    max_def: i16,
    row_group: usize,
    /// First row of the current row group.
    group_first_row: u64,
    /// Rows of the current row group already consumed.
    group_rows_done: u64,
    group_rows: u64,
    column_reader: Option<ColumnReaderImpl<ByteArrayType>>,
    pending: std::collections::VecDeque<Event>,
    defs: Vec<i16>,
    values: Vec<ByteArray>,
}

impl ParquetDocs {
    pub fn open(path: &Path, text_field: &str) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
        let reader = SerializedFileReader::new(file)
            .map_err(|e| format!("not a readable parquet file: {e}"))?;
        let schema = reader.metadata().file_metadata().schema_descr_ptr();
        let column = (0..schema.num_columns())
            .find(|&i| schema.column(i).path().string() == text_field)
            .ok_or_else(|| {
                let names: Vec<String> = (0..schema.num_columns())
                    .map(|i| schema.column(i).path().string())
                    .collect();
                format!("no column `{text_field}` (columns: {})", names.join(", "))
            })?;
        let descr = schema.column(column);
        if descr.physical_type() != parquet::basic::Type::BYTE_ARRAY {
            return Err(format!(
                "column `{text_field}` holds {:?}, not strings",
                descr.physical_type()
            ));
        }
        if descr.max_rep_level() > 0 {
            return Err(format!(
                "column `{text_field}` is repeated, not one string per row"
            ));
        }
        Ok(ParquetDocs {
            max_def: descr.max_def_level(),
            reader,
            column,
            row_group: 0,
            group_first_row: 0,
            group_rows_done: 0,
            group_rows: 0,
            column_reader: None,
            pending: Default::default(),
            defs: Vec::with_capacity(ROWS_PER_READ),
            values: Vec::with_capacity(ROWS_PER_READ),
        })
    }

    /// Opens the next row group's text column; false when there is none.
    fn next_group(&mut self) -> bool {
        loop {
            self.group_first_row += self.group_rows;
            self.group_rows_done = 0;
            let i = self.row_group;
            if i >= self.reader.num_row_groups() {
                return false;
            }
            self.row_group += 1;
            self.group_rows = self.reader.metadata().row_group(i).num_rows().max(0) as u64;
            let opened = self
                .reader
                .get_row_group(i)
                .and_then(|g| g.get_column_reader(self.column));
            match opened {
                Ok(r) => {
                    self.column_reader = Some(get_typed_column_reader::<ByteArrayType>(r));
                    return true;
                }
                Err(e) => self.pending.push_back(Event::Damage {
                    row: Some(self.group_first_row),
                    reason: format!(
                        "row group {i} unreadable, {} rows lost: {e}",
                        self.group_rows
                    ),
                }),
            }
        }
    }

    fn read_some(&mut self) {
        let Some(reader) = self.column_reader.as_mut() else {
            return;
        };
        self.defs.clear();
        self.values.clear();
        let defs = (self.max_def > 0).then_some(&mut self.defs);
        match reader.read_records(ROWS_PER_READ, defs, None, &mut self.values) {
            Ok((0, _, _)) => {
                if self.group_rows_done < self.group_rows {
                    self.pending.push_back(Event::Damage {
                        row: Some(self.group_first_row + self.group_rows_done),
                        reason: format!(
                            "row group {} ends early, {} rows lost",
                            self.row_group - 1,
                            self.group_rows - self.group_rows_done
                        ),
                    });
                }
                self.column_reader = None;
            }
            Ok((records, _, _)) => {
                let mut values = std::mem::take(&mut self.values).into_iter();
                for i in 0..records {
                    let row = self.group_first_row + self.group_rows_done + i as u64;
                    let present = self.max_def == 0 || self.defs.get(i) == Some(&self.max_def);
                    let event = match (present, present.then(|| values.next()).flatten()) {
                        (true, Some(v)) => bytes_event(row, v.data().to_vec()),
                        _ => Event::Skip {
                            row,
                            reason: SkipReason::NoText,
                        },
                    };
                    self.pending.push_back(event);
                }
                self.group_rows_done += records as u64;
            }
            Err(e) => {
                let row = self.group_first_row + self.group_rows_done;
                self.pending.push_back(Event::Damage {
                    row: Some(row),
                    reason: format!(
                        "corrupt data in row group {}, {} rows lost: {e}",
                        self.row_group - 1,
                        self.group_rows - self.group_rows_done
                    ),
                });
                self.column_reader = None;
            }
        }
    }
}

impl Iterator for ParquetDocs {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.column_reader.is_none() && !self.next_group() {
                return self.pending.pop_front();
            }
            self.read_some();
        }
    }
}

/// One row of an OpenWebMath-style shard.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub url: String,
    /// `None` writes a null, as a row without text.
    pub text: Option<String>,
    pub date: String,
    /// A JSON document, as OpenWebMath stores it.
    pub metadata: String,
}

/// Writes rows as a zstd-compressed parquet shard with the OpenWebMath schema, `rows_per_group`
/// rows per row group.
pub fn write_shard(path: &Path, rows: &[Row], rows_per_group: usize) -> std::io::Result<()> {
    let schema = parse_message_type(
        "message schema {
            OPTIONAL BYTE_ARRAY url (UTF8);
            OPTIONAL BYTE_ARRAY text (UTF8);
            OPTIONAL BYTE_ARRAY date (UTF8);
            OPTIONAL BYTE_ARRAY metadata (UTF8);
        }",
    )
    .map_err(std::io::Error::other)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let file = File::create(path)?;
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props))
        .map_err(std::io::Error::other)?;
    for group in rows.chunks(rows_per_group.max(1)) {
        let mut rg = writer.next_row_group().map_err(std::io::Error::other)?;
        let columns: [Vec<Option<&str>>; 4] = [
            group.iter().map(|r| Some(r.url.as_str())).collect(),
            group.iter().map(|r| r.text.as_deref()).collect(),
            group.iter().map(|r| Some(r.date.as_str())).collect(),
            group.iter().map(|r| Some(r.metadata.as_str())).collect(),
        ];
        for column in columns {
            let mut col = rg
                .next_column()
                .map_err(std::io::Error::other)?
                .ok_or_else(|| std::io::Error::other("schema has fewer columns"))?;
            let defs: Vec<i16> = column.iter().map(|v| i16::from(v.is_some())).collect();
            let values: Vec<ByteArray> = column
                .iter()
                .flatten()
                .map(|s| ByteArray::from(s.as_bytes().to_vec()))
                .collect();
            col.typed::<ByteArrayType>()
                .write_batch(&values, Some(&defs), None)
                .map_err(std::io::Error::other)?;
            col.close().map_err(std::io::Error::other)?;
        }
        rg.close().map_err(std::io::Error::other)?;
    }
    writer.close().map_err(std::io::Error::other)?;
    Ok(())
}
