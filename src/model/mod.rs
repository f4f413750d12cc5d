//! The networks of docs/model.md §4: parameter table and flat storage, initialisation, checkpoints,
//! the layers with hand-written backward passes, and the teacher/student forward and
//! backward.
//!
//! Data flow of one network (teacher: in-service sequence; student: pre-service):
//! event embedding → N pre-LN blocks → final LN → masked mean `s` (or `s_∅`);
//! profile → `p`; `H = GELU(W_f·[s ; p] + b_f)`; `z = w·H + c`.

pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod device_batch;
pub mod dump;
pub mod encoder;
pub mod layers;
pub mod net;
pub mod params;
pub mod teacher;

pub use config::{ModelConfig, Role};
pub use device_batch::{DeviceBatch, DeviceSeq, PendingBatch, StagedBatch};
pub use net::{Forward, InferChunks, Inference, Model, OutputGrads};
pub use params::{ParamEntry, ParamStore, ParamTable};
pub use teacher::{Teacher, TeacherCache, TeacherIds, TeacherIndex, TeacherOutputs};
