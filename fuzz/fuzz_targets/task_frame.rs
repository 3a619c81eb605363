//! Task frame decoding never panics; accepted tasks re-encode and decode
//! to the same task.
#![no_main]

use elkeid_core::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((task, used))) = frame::decode_task_frame(data, 1 << 16) else {
        return;
    };
    assert!(used <= data.len());
    let mut out = vec![0u8; frame::task_frame_len(&task)];
    let n = frame::encode_task_frame(&task, &mut out).expect("sized buffer");
    assert_eq!(n, out.len());
    let (again, used2) = frame::decode_task_frame(&out, 1 << 16).unwrap().unwrap();
    assert_eq!((again, used2), (task, n));
});
