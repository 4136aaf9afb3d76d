//! The one place where core errors become Python exceptions.
//!
//! Exception classes are created once here (in module `moeflow._core`) and
//! re-exported by `moeflow/errors.py`; each instance carries the numbers of its
//! error (`requested`, `available`, `errno`, `path`, ...) as attributes.

use moeflow_core::CoreError;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;

create_exception!(
    moeflow._core,
    MoeflowError,
    PyException,
    "Base class of every moeflow error."
);
create_exception!(
    moeflow._core,
    OutOfBudget,
    MoeflowError,
    "An allocation would exceed the budget or the arena; `requested` and `available` are bytes."
);
create_exception!(
    moeflow._core,
    InvalidHandle,
    MoeflowError,
    "A block handle that is not valid here."
);
create_exception!(
    moeflow._core,
    StaleHandle,
    InvalidHandle,
    "The handle's block was freed (double free or use after free)."
);
create_exception!(
    moeflow._core,
    ForeignHandle,
    InvalidHandle,
    "The handle belongs to another allocator."
);
create_exception!(
    moeflow._core,
    BlockPinned,
    MoeflowError,
    "The block is pinned and cannot be freed."
);
create_exception!(
    moeflow._core,
    ArenaError,
    MoeflowError,
    "An arena could not be created; `requested` is bytes."
);
create_exception!(
    moeflow._core,
    AlignmentError,
    MoeflowError,
    "An O_DIRECT request is not aligned."
);
create_exception!(
    moeflow._core,
    TransferError,
    MoeflowError,
    "A transfer failed; `op`, `path`, `errno`, `offset` and `length` say where."
);
create_exception!(
    moeflow._core,
    ShortRead,
    TransferError,
    "The file ends before the range; `got` bytes exist."
);
create_exception!(
    moeflow._core,
    ChecksumMismatch,
    TransferError,
    "The bytes read have another CRC-32 (`expected`, `actual`)."
);
create_exception!(
    moeflow._core,
    CudaError,
    MoeflowError,
    "A CUDA driver call failed; `code` is its CUresult."
);
create_exception!(
    moeflow._core,
    CudaUnavailable,
    CudaError,
    "No usable CUDA driver or device."
);
create_exception!(
    moeflow._core,
    EngineClosed,
    MoeflowError,
    "The transfer engine is closed."
);

create_exception!(
    moeflow._core,
    HazardError,
    MoeflowError,
    "The simulated device's hazard checker saw an ordering bug; `kind` is \
     'read-before-copy', 'copy-over-read' or 'poison', `address` and `length` the bytes."
);

/// `CUDA_ERROR_NO_DEVICE`: the code reported when CUDA is unavailable.
const CUDA_ERROR_NO_DEVICE: i32 = 100;

/// A core error or a Python error, convertible to `PyErr` (polars' `PyPolarsErr` pattern).
#[derive(Debug)]
pub enum PyCoreErr {
    Core(CoreError),
    Python(PyErr),
}

/// Result type of every binding that can fail.
pub type PyCoreResult<T> = Result<T, PyCoreErr>;

impl From<CoreError> for PyCoreErr {
    fn from(err: CoreError) -> Self {
        Self::Core(err)
    }
}

impl From<PyErr> for PyCoreErr {
    fn from(err: PyErr) -> Self {
        Self::Python(err)
    }
}

impl From<PyCoreErr> for PyErr {
    fn from(err: PyCoreErr) -> Self {
        match err {
            PyCoreErr::Core(core) => Python::attach(|py| to_pyerr(py, &core)),
            PyCoreErr::Python(py_err) => py_err,
        }
    }
}

/// Builds the typed exception of `err`, its attributes set on the instance.
pub fn to_pyerr(py: Python<'_>, err: &CoreError) -> PyErr {
    let message = err.to_string();
    let (exc, attrs): (PyErr, Vec<(&str, Py<PyAny>)>) = match err {
        CoreError::OutOfBudget {
            requested,
            available,
            ..
        } => (
            OutOfBudget::new_err(message),
            vec![
                ("requested", int(py, *requested)),
                ("available", int(py, *available)),
            ],
        ),
        CoreError::InvalidHandle { .. } => (InvalidHandle::new_err(message), vec![]),
        CoreError::StaleHandle { .. } => (StaleHandle::new_err(message), vec![]),
        CoreError::ForeignHandle { .. } => (ForeignHandle::new_err(message), vec![]),
        CoreError::BlockPinned { .. } => (BlockPinned::new_err(message), vec![]),
        CoreError::Arena { requested, .. } => (
            ArenaError::new_err(message),
            vec![("requested", int(py, *requested))],
        ),
        CoreError::Alignment(_) => (AlignmentError::new_err(message), vec![]),
        CoreError::Transfer {
            op,
            path,
            errno,
            offset,
            length,
            ..
        } => (
            TransferError::new_err(message),
            transfer_attrs(py, op, path.as_deref(), *errno, *offset, *length),
        ),
        CoreError::ShortRead {
            path,
            offset,
            length,
            got,
        } => {
            let mut attrs =
                transfer_attrs(py, "read", Some(path), None, Some(*offset), Some(*length));
            attrs.push(("got", int(py, *got)));
            (ShortRead::new_err(message), attrs)
        }
        CoreError::ChecksumMismatch {
            path,
            offset,
            length,
            expected,
            actual,
        } => {
            let mut attrs =
                transfer_attrs(py, "read", Some(path), None, Some(*offset), Some(*length));
            attrs.push(("expected", int(py, *expected)));
            attrs.push(("actual", int(py, *actual)));
            (ChecksumMismatch::new_err(message), attrs)
        }
        CoreError::Cuda { code, .. } => {
            (CudaError::new_err(message), vec![("code", int(py, *code))])
        }
        CoreError::CudaUnavailable(_) => (
            CudaUnavailable::new_err(message),
            vec![("code", int(py, CUDA_ERROR_NO_DEVICE))],
        ),
        CoreError::EngineClosed => (EngineClosed::new_err(message), vec![]),
        CoreError::Hazard {
            kind,
            address,
            length,
            ..
        } => (
            HazardError::new_err(message),
            vec![
                ("kind", int(py, kind.as_str())),
                ("address", int(py, *address)),
                ("length", int(py, *length)),
            ],
        ),
        CoreError::InvalidArgument(_) => (PyValueError::new_err(message), vec![]),
        CoreError::WrongKind(_) => (PyTypeError::new_err(message), vec![]),
    };
    let value = exc.value(py);
    for (name, attr) in attrs {
        if let Err(set_err) = value.setattr(name, attr) {
            return set_err;
        }
    }
    exc
}

fn int<T: for<'py> IntoPyObject<'py>>(py: Python<'_>, value: T) -> Py<PyAny> {
    // Integers and strings always convert; None keeps the exception usable if one
    // ever does not.
    value.into_py_any(py).unwrap_or_else(|_| py.None())
}

fn opt<T: for<'py> IntoPyObject<'py>>(py: Python<'_>, value: Option<T>) -> Py<PyAny> {
    value.map_or_else(|| py.None(), |v| int(py, v))
}

fn transfer_attrs(
    py: Python<'_>,
    op: &str,
    path: Option<&str>,
    errno: Option<i32>,
    offset: Option<u64>,
    length: Option<u64>,
) -> Vec<(&'static str, Py<PyAny>)> {
    vec![
        ("op", int(py, op)),
        ("path", opt(py, path)),
        ("errno", opt(py, errno)),
        ("offset", opt(py, offset)),
        ("length", opt(py, length)),
    ]
}

/// Registers every exception class on the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("MoeflowError", py.get_type::<MoeflowError>())?;
    m.add("OutOfBudget", py.get_type::<OutOfBudget>())?;
    m.add("InvalidHandle", py.get_type::<InvalidHandle>())?;
    m.add("StaleHandle", py.get_type::<StaleHandle>())?;
    m.add("ForeignHandle", py.get_type::<ForeignHandle>())?;
    m.add("BlockPinned", py.get_type::<BlockPinned>())?;
    m.add("ArenaError", py.get_type::<ArenaError>())?;
    m.add("AlignmentError", py.get_type::<AlignmentError>())?;
    m.add("TransferError", py.get_type::<TransferError>())?;
    m.add("ShortRead", py.get_type::<ShortRead>())?;
    m.add("ChecksumMismatch", py.get_type::<ChecksumMismatch>())?;
    m.add("CudaError", py.get_type::<CudaError>())?;
    m.add("CudaUnavailable", py.get_type::<CudaUnavailable>())?;
    m.add("EngineClosed", py.get_type::<EngineClosed>())?;
    m.add("HazardError", py.get_type::<HazardError>())?;
    Ok(())
}
